"""What a request adds to plain text to image, one module per feature, each a `stages.Feature`:

- img2img: the first pass starts from an encoded image, noised to the strength's first timestep.
- inpainting: the same within a mask — latent fills, the unmasked area kept each step (4-channel UNet) or
  the mask and masked image as UNet inputs (9-channel), "only masked" pasted back after decoding.
- variations: each image's noise moved toward its variation seed's.
- hires: the first pass upscaled and redrawn by a second pass.
"""
