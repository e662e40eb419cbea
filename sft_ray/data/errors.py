"""The one error of the data stage: input that cannot be prepared, or prepared data that must not be trained on."""


class DataError(ValueError):
    """Its message names the config key, file or manifest to look at."""
