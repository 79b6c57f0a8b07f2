"""Raw scanner studies → model inputs: reading a study folder as the scanner or PACS
wrote it (DICOM files in any nesting, or NIfTI files with dcm2niix JSON sidecars),
identifying its T1, T1ce, T2 and FLAIR series (`medseg.raw.study`), and the steps
that follow. Kept free of imports, so that each module pulls in only what it needs
(`medseg study` never imports torch or MONAI).
"""
