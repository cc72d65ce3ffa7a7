"""Data: COCO captions, the synthetic demo set, and the loaders that feed training.

Import from the modules themselves (``ldm.data.coco_index``, ``ldm.data.datamodule``, ...): the
package imports nothing, so ``python -m ldm.data.synthetic`` and ``python -m
ldm.data.coco_download`` run their module once, not a second copy beside one already imported.
"""
