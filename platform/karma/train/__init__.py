"""Training: the one loop, the plain run, the DeepSpeed engine setup and the Ray Train job."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf: the run stops before anything is saved from it.
    Defined here, with no imports, so the command line can catch it without loading torch."""
