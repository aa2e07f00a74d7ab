"""Data validation with Great Expectations: quarantine bad cases, check the split.

- :func:`tumorseg.validation.suite.validate_dataset` — ``tumorseg validate``: run the GX
  suite on a manifest, quarantine failing cases with a reason, write ``report.json`` and
  Data Docs; :func:`tumorseg.validation.report.validation_markdown` summarises the result.
- :func:`tumorseg.validation.split_check.validate_split` — no patient, no duplicated scan in two splits.
- :mod:`tumorseg.validation.case_table` and :mod:`tumorseg.validation.expectations` — the
  typed per-case table and the checks on it (no GX import; unit-tested on their own).
- :mod:`tumorseg.validation.duplicates` — one scan under several case ids (identical file or
  same decoded volume): flagged in ``duplicate_of``, never quarantined.

Nothing is imported here, so importing the package stays cheap (GX takes seconds to import).
"""
