"""Triton model-folder templates, shipped in the wheel as ``grym_synth.model_repository`` (package data).

``grym-synth export`` copies these folders into ``DATA_DIR/model_repository/PROFILE`` and adds the exported ONNX
files; Triton never serves this folder itself. It is a package only so that ``importlib.resources`` finds it the
same way in a checkout, an editable install and an installed wheel.
"""
