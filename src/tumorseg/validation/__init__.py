"""Data validation with Great Expectations: quarantine bad cases (:mod:`~tumorseg.validation.suite`), check
the split (:mod:`~tumorseg.validation.split_check`). Nothing is imported here: GX takes seconds to import.
"""
