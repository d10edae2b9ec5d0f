"""The pyfuse3 Operations: translate FUSE calls to the layers below, errno out."""
