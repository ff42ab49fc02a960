"""whisperd: a Whisper transcription daemon that owns the GPUs, the queue and the scheduler."""

__version__ = "0.1.0"
