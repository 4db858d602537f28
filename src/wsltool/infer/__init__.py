"""Slide inference: region prediction, stitching (:mod:`wsltool.infer.stitch`) and the one call the shells make.

Kept free of imports so that ``wsltool.infer.stitch`` loads without torch.
"""
