"""The napari plugin (npe2): readers, widgets and sample data.

This is the only package of wsltool that imports napari or Qt, and it never imports torch: heavy
work (inference, training) runs in a worker process through the core API.
"""
