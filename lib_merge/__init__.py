"""Block Merger: block-weighted Stable Diffusion checkpoint merging, usable inside the WebUI or on its own."""

__version__ = "0.1.0"
