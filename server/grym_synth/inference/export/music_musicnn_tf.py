"""musicnn -> ONNX, run INSIDE the throwaway TensorFlow venv (see music_musicnn.py); not imported by grym-synth.

``python music_musicnn_tf.py OUT_DIR REFERENCE_WAV``: builds musicnn's MTT_musicnn graph exactly as
``musicnn.extractor.extractor`` does (``models.define_model`` on a [None, 187, 96] placeholder, the package's
checkpoint restored), with ``is_training`` fixed to False (the extractor feeds False), freezes it and converts it
with tf2onnx to ``OUT_DIR/model.onnx`` (input ``patches``; outputs ``taggram`` = sigmoid(logits), ``embedding`` =
the 200-d ``penultimate`` layer, ``timbre`` = the 408-d ``timbral`` front-end features averaged over the patch's
frames). It then runs musicnn's own ``extractor`` on REFERENCE_WAV and writes ``OUT_DIR/reference.npz``: the
extractor's taggram, batch and timbral features, and the penultimate layer of every patch from the same restored
TensorFlow session (the extractor's own ``features["penultimate"]`` repeats the first patch's value for
every later patch — a bug in musicnn 0.1.0's batch loop, which concatenates a stale variable — so only its first
row is usable; the script stores it too and checks it against the session's first row).

Only TensorFlow <= 2.15 reads these TF1 checkpoints through the v1 layers API, and TensorFlow cannot live beside
grym-synth's protobuf 6, hence the separate interpreter.
"""

import os
import sys


def main(out_dir: str, reference_wav: str) -> None:  # pragma: no cover - runs in the TensorFlow venv
    import numpy as np
    import tensorflow as tf
    import tf2onnx
    from musicnn import configuration, extractor, models

    tf.compat.v1.disable_eager_execution()
    model_dir = os.path.join(os.path.dirname(extractor.__file__), "MTT_musicnn")
    n_frames = 187
    graph = tf.Graph()
    with graph.as_default():
        with tf.name_scope("model"):
            x = tf.compat.v1.placeholder(tf.float32, [None, n_frames, configuration.N_MELS], name="patches")
            is_training = tf.constant(False)
            outs = models.define_model(x, is_training, "MTT_musicnn", len(configuration.MTT_LABELS))
            taggram = tf.identity(tf.nn.sigmoid(outs[0]), name="taggram")
            embedding = tf.identity(outs[-1], name="embedding")
            # outs[1]: the timbral front-end [patch, 187 frames, 408 filters]; the frame mean is taken in the graph
            # so a patch returns 408 numbers, not 76k.
            timbre = tf.identity(tf.reduce_mean(outs[1], axis=1), name="timbre")
        sess = tf.compat.v1.Session(graph=graph)
        tf.compat.v1.train.Saver().restore(sess, model_dir + "/")
        frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
            sess, graph.as_graph_def(), ["model/taggram", "model/embedding", "model/timbre"])
    model_proto, _ = tf2onnx.convert.from_graph_def(
        frozen, input_names=["model/patches:0"],
        output_names=["model/taggram:0", "model/embedding:0", "model/timbre:0"], opset=17)
    rename = {"model/patches:0": "patches", "model/taggram:0": "taggram", "model/embedding:0": "embedding",
              "model/timbre:0": "timbre"}
    for value in list(model_proto.graph.input) + list(model_proto.graph.output):
        value.name = rename.get(value.name, value.name)
    for node in model_proto.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    with open(os.path.join(out_dir, "model.onnx"), "wb") as f:
        f.write(model_proto.SerializeToString())

    ref_taggram, _, features = extractor.extractor(reference_wav, model="MTT_musicnn", input_length=3,
                                                   input_overlap=False, extract_features=True)
    batch, _ = extractor.batch_data(reference_wav, n_frames, n_frames)
    tf_taggram, tf_embedding, tf_timbre = sess.run([taggram, embedding, timbre], feed_dict={x: batch})
    # the extractor's timbral features are [patches x 187 frames, 408]: the mean of each patch's frames
    ref_timbre = np.asarray(features["timbral"], np.float64).reshape(len(batch), n_frames, -1).mean(axis=1)
    assert np.allclose(tf_taggram, ref_taggram, atol=1e-6), "graph != extractor taggram"
    assert np.allclose(tf_embedding[0], features["penultimate"][0], atol=1e-6), "graph != extractor penultimate"
    assert np.allclose(tf_timbre, ref_timbre, atol=1e-5), "graph != extractor timbral"
    np.savez(os.path.join(out_dir, "reference.npz"), taggram=ref_taggram.astype(np.float32),
             embedding=tf_embedding.astype(np.float32), timbre=ref_timbre.astype(np.float32),
             extractor_penultimate=np.asarray(features["penultimate"], np.float32),
             batch=batch.astype(np.float32), tensorflow=np.array(tf.__version__))
    sess.close()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1], sys.argv[2])
