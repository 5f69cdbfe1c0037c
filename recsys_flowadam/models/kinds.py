"""The model types and the parts each has, without importing torch (the artifact schema and the
service read them too)."""

MODEL_TYPES = ("mf", "biased-mf", "cp", "svdpp", "time-mf", "time-svdpp")
IMPLICIT_MODELS = ("svdpp", "time-svdpp")  # a user factor corrected by implicit feedback (models.svdpp)
TIME_MODELS = ("time-mf", "time-svdpp")  # biases that move with time (models.time_axis)
