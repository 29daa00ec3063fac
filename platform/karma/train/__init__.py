"""Training: the plain loop, the DeepSpeed engine setup and the Ray Train job."""
