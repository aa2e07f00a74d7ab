"""DICOM studies in (series grouping, classification, co-registration, N4, brain extraction) and
DICOM Segmentation objects out."""
