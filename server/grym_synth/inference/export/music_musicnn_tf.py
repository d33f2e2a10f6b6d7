"""musicnn -> ONNX, run INSIDE the throwaway TensorFlow venv (see music_musicnn.py); not imported by grym-synth.

``python music_musicnn_tf.py OUT_DIR REFERENCE_WAV``: builds musicnn's MTT_musicnn and MTT_vgg graphs exactly as
``musicnn.extractor.extractor`` does (``models.define_model`` on a [None, 187, 96] placeholder, the package's
checkpoint restored), each with ``is_training`` fixed to False (the extractor feeds False), freezes them, joins
them on one input and converts the result with tf2onnx to ``OUT_DIR/model.onnx`` (input ``patches``; outputs
``taggram`` = MTT_musicnn's sigmoid(logits), ``embedding`` = its 200-d ``penultimate`` layer, ``timbre`` = its 408-d
``timbral`` front-end features averaged over the patch's frames, ``vgg_taggram`` = MTT_vgg's sigmoid(logits)).
It then runs musicnn's own ``extractor`` with both models on REFERENCE_WAV and writes ``OUT_DIR/reference.npz``:
the extractor's taggrams, batch and timbral features, and the penultimate layer of every patch from the restored
TensorFlow session (the extractor's own ``features["penultimate"]`` repeats the first patch's value for every
later patch — a bug in musicnn 0.1.0's batch loop, which concatenates a stale variable — so only its first row is
usable; the script stores it too and checks it against the session's first row).

Why one graph for two models: both read the same patches, so one Triton model and one request per batch of
patches serve both, and the joined graph costs 1.45x the time of MTT_musicnn alone (measured with onnxruntime, 2
threads: 227 vs 157 ms for 16 patches).

Only TensorFlow <= 2.15 reads these TF1 checkpoints through the v1 layers API, and TensorFlow cannot live beside
grym-synth's protobuf 6, hence the separate interpreter.
"""

import os
import sys


N_FRAMES = 187  # 3 s patches, as the extractor cuts them for both models
OUTPUTS = {"taggram": "musicnn/model/taggram:0", "embedding": "musicnn/model/embedding:0",
           "timbre": "musicnn/model/timbre:0", "vgg_taggram": "vgg/model/taggram:0"}


def _freeze(tf, name: str, heads):  # pragma: no cover - runs in the TensorFlow venv
    """One musicnn model's graph as the extractor builds it, its checkpoint restored, frozen with ``heads`` (output
    name -> function of ``define_model``'s outputs) as ``model/<head>``; returns (frozen GraphDef, session, input,
    {name: tensor}) so the caller can also run the restored session for the reference."""
    from musicnn import configuration, extractor, models

    graph = tf.Graph()
    with graph.as_default():
        with tf.name_scope("model"):
            x = tf.compat.v1.placeholder(tf.float32, [None, N_FRAMES, configuration.N_MELS], name="patches")
            outs = models.define_model(x, tf.constant(False), name, len(configuration.MTT_LABELS))
            tensors = {head: tf.identity(fn(outs), name=head) for head, fn in heads.items()}
        sess = tf.compat.v1.Session(graph=graph)
        tf.compat.v1.train.Saver().restore(sess, os.path.join(os.path.dirname(extractor.__file__), name) + "/")
        frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
            sess, graph.as_graph_def(), [f"model/{head}" for head in heads])
    return frozen, sess, x, tensors


def main(out_dir: str, reference_wav: str) -> None:  # pragma: no cover - runs in the TensorFlow venv
    import numpy as np
    import tensorflow as tf
    import tf2onnx
    from musicnn import configuration, extractor

    tf.compat.v1.disable_eager_execution()
    # MTT_musicnn's outputs[1] is the timbral front-end [patch, 187 frames, 408 filters]; its frame mean is taken in
    # the graph so a patch returns 408 numbers, not 76k. outputs[-1] is the 200-d penultimate layer.
    musicnn, m_sess, m_x, m_out = _freeze(tf, "MTT_musicnn", {
        "taggram": lambda o: tf.nn.sigmoid(o[0]), "embedding": lambda o: o[-1],
        "timbre": lambda o: tf.reduce_mean(o[1], axis=1)})
    vgg, v_sess, v_x, v_out = _freeze(tf, "MTT_vgg", {"taggram": lambda o: tf.nn.sigmoid(o[0])})
    merged = tf.Graph()
    with merged.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, N_FRAMES, configuration.N_MELS], name="patches")
        tf.import_graph_def(musicnn, input_map={"model/patches:0": x}, name="musicnn")
        tf.import_graph_def(vgg, input_map={"model/patches:0": x}, name="vgg")
    model_proto, _ = tf2onnx.convert.from_graph_def(
        merged.as_graph_def(), input_names=["patches:0"], output_names=list(OUTPUTS.values()), opset=17)
    rename = {"patches:0": "patches", **{tensor: name for name, tensor in OUTPUTS.items()}}
    for value in list(model_proto.graph.input) + list(model_proto.graph.output):
        value.name = rename.get(value.name, value.name)
    for node in model_proto.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    with open(os.path.join(out_dir, "model.onnx"), "wb") as f:
        f.write(model_proto.SerializeToString())

    ref_taggram, _, features = extractor.extractor(reference_wav, model="MTT_musicnn", input_length=3,
                                                   input_overlap=False, extract_features=True)
    ref_vgg, _ = extractor.extractor(reference_wav, model="MTT_vgg", input_length=3, input_overlap=False,
                                     extract_features=False)
    batch, _ = extractor.batch_data(reference_wav, N_FRAMES, N_FRAMES)
    tf_taggram, tf_embedding, tf_timbre = m_sess.run([m_out["taggram"], m_out["embedding"], m_out["timbre"]],
                                                     feed_dict={m_x: batch})
    tf_vgg = v_sess.run(v_out["taggram"], feed_dict={v_x: batch})
    # the extractor's timbral features are [patches x 187 frames, 408]: the mean of each patch's frames
    ref_timbre = np.asarray(features["timbral"], np.float64).reshape(len(batch), N_FRAMES, -1).mean(axis=1)
    assert np.allclose(tf_taggram, ref_taggram, atol=1e-6), "graph != extractor taggram"
    assert np.allclose(tf_embedding[0], features["penultimate"][0], atol=1e-6), "graph != extractor penultimate"
    assert np.allclose(tf_timbre, ref_timbre, atol=1e-5), "graph != extractor timbral"
    assert np.allclose(tf_vgg, ref_vgg, atol=1e-6), "graph != extractor MTT_vgg taggram"
    np.savez(os.path.join(out_dir, "reference.npz"), taggram=ref_taggram.astype(np.float32),
             embedding=tf_embedding.astype(np.float32), timbre=ref_timbre.astype(np.float32),
             vgg_taggram=ref_vgg.astype(np.float32),
             extractor_penultimate=np.asarray(features["penultimate"], np.float32),
             batch=batch.astype(np.float32), tensorflow=np.array(tf.__version__))
    m_sess.close()
    v_sess.close()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1], sys.argv[2])
