"""Every error a user can cause and fix: a bad config, path, dataset or checkpoint.

The command lines print these as one `error: ...` line (exit code 1) instead of a
traceback (`USER_ERRORS`, cli/runner.py). Each message names the file or config key
at fault and what was expected. Errors outside this list are bugs and keep their
traceback.
"""


class ConfigError(ValueError):
  """A config key has a value the run cannot use; the message names the key."""


class MeshConfigError(ConfigError):
  """`config.mesh` does not fit the devices or the parameters."""


class CropConfigError(ConfigError):
  """A crop in `config.data.transforms` does not fit an image that reaches it."""


class WorkdirError(OSError):
  """The workdir cannot be written, or its disk is full."""


class CheckpointError(RuntimeError):
  """No checkpoint, or none that this config can restore."""


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed; the ones already complete are intact."""


class BadSampleError(ValueError):
  """A dataset file cannot be read or does not match its layout; names the file."""


class ClassListError(ValueError):
  """The class list of a folder dataset (classes.txt) is missing or malformed: no
  file, an empty or duplicated name, a bad colour; names the file and line."""


class ImageReadError(ValueError):
  """An image file cannot be decoded (missing, empty, not an image, truncated, too
  large, an unsupported sample type); names the file and the reason."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf (`config.train.on_nan="stop"`); names the step."""


class DistributedError(RuntimeError):
  """Another process of a multi-process run failed; names it and its error."""


USER_ERRORS = (
    ConfigError,
    WorkdirError,
    CheckpointError,
    BadSampleError,
    ClassListError,
    ImageReadError,
    NonFiniteLossError,
    DistributedError,
    FileNotFoundError,
)
