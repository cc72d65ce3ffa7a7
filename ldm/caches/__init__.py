"""Stage 2's caches: the VAE posterior of every image and the text encoder's hidden states of
every caption, encoded once so that U-Net training runs neither network.

``image_latents`` and ``caption_states`` build and open one cache each, ``dataset`` gathers
batches from them, and ``datamodule`` checks them against the run's VAE export, text encoder and
data, builds what is missing or stale, and serves the loaders. ``python -m ldm.caches
[overrides]`` builds them without training (see ``__main__``).
"""
