"""After training: what a finished run directory (results/<run>/) turns into.

* fedsafe.after.export: the global (or best) model as ONNX or TorchScript, with its input spec and card;
* fedsafe.after.predict: scoring a CSV/NPZ with an exported ONNX model (onnxruntime and numpy only);
* fedsafe.after.card: MODEL_CARD.md and model_card.json, the run's privacy record and held-out metrics;
* fedsafe.after.explain: Captum attributions of the global model on the server's held-out data;
* fedsafe.after.compress: a pruned, int8-quantised model, size and accuracy before and after.

Each reads the run through fedsafe.after.run.open_run. Nothing here imports a submodule eagerly:
`fedsafe predict` must work where only onnxruntime and numpy are installed.
"""
