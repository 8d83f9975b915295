"""finpercep: FinPercep-RM, a fine-grained perceptual reward model for real-world super-resolution.

``import finpercep`` stays light: heavy or optional pieces are imported where they are used.
"""

__version__ = "0.1.0"
