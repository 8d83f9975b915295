"""finpercep: FinPercep-RM, a fine-grained perceptual reward model for real-world super-resolution.

``import finpercep`` stays light: heavy or optional pieces are imported where they are used.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `finpercep.load_reward` without importing torch models at `import finpercep`.
    if name == "load_reward":
        from finpercep.reward.api import load_reward

        return load_reward
    raise AttributeError(f"module 'finpercep' has no attribute {name!r}")
