"""ldm-coco: a small latent diffusion model trained on MS-COCO captions."""
