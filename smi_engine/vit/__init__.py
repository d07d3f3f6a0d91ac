"""The sparse ViT core: a timm ViT run on the kept patches only (``sparse_vit``), the image as
an optimisable set of patch vectors (``sparse_image``), the patch grid (``patches``) and the
pixel-exact augmentations the loop applies to it (``augment``)."""
