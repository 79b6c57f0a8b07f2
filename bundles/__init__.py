"""medseg's MONAI bundles. Installed with the package as ``medseg.bundles``, so the
default experiment definition (``brats_unet3d``) is there without a source checkout."""
