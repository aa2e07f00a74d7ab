"""tumorseg.serving: the HTTP service behind ``tumorseg serve`` (FastAPI app in :mod:`~tumorseg.serving.app`,
state in :mod:`~tumorseg.serving.service`, the viewer page in ``static/``)."""
