"""Deployment: a guarded classifier (``Guard``) whose OOD decisions have a known false-alarm rate, saved as one
artifact, exported to ONNX or TorchScript."""
