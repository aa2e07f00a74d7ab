"""tumorseg.serving: the HTTP service behind ``tumorseg serve``.

- :mod:`~tumorseg.serving.app`: ``create_app(settings)``, the FastAPI application (``POST /predict``,
  ``/health``, the viewer's endpoints, ``/docs``) and ``serve()`` (uvicorn);
- :mod:`~tumorseg.serving.service`: ``ServeSettings``, the ``Service`` state (models, pool, store, temp
  folder) and the jobs its pool threads run;
- :mod:`~tumorseg.serving.predict_routes`, :mod:`~tumorseg.serving.viewer_routes`,
  :mod:`~tumorseg.serving.error_handlers`: the endpoints by group, and errors as one-line JSON;
- :mod:`~tumorseg.serving.uploads`: uploads and zip archives checked and staged as one case folder;
- :mod:`~tumorseg.serving.planar`: the optional 2-D model, 2-D uploads checked before decoding, the 2-D job;
- :mod:`~tumorseg.serving.limits`: body-size and time limits per request, the bounded inference pool;
- :mod:`~tumorseg.serving.viewer`: display volumes, slices, Dice and the bounded result store;
- :mod:`~tumorseg.serving.config`: the ``serve:`` section of params.yaml;
- ``static/``: the viewer page (plain HTML, CSS and JavaScript; no external resources).
"""
