"""The Dockerfile, checked without a Docker engine: it installs what the Makefile installs, in the
same order, and its CMD / HEALTHCHECK / COPY name things that exist.

The one deliberate difference: the image takes the pinned torch from PyTorch's CPU wheel index
(PyPI's Linux wheel pulls gigabytes of CUDA libraries); torch's version is still the constraints
file's, and everything else goes through ``-c constraints.txt`` exactly as ``make venv`` does.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

from serving_support import ROOT

from tumorseg.cli import build_parser


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    logical: list[str] = []
    buffer = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        buffer += " " + stripped.removesuffix("\\").strip() if buffer else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            logical.append(buffer)
            buffer = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def pip_installs(commands: list[str], variables: dict[str, str]) -> list[dict]:
    """Each ``pip install`` as its requirement targets, constraints file, index and editable flag."""
    found = []
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(
                re.sub(r"\$\{(\w+)\}|\$\((\w+)\)", lambda m: variables.get(m[1] or m[2], ""), part)
            )
            if "pip" not in words or "install" not in words:
                continue
            args = words[words.index("install") + 1 :]
            entry = {
                "targets": [],
                "constraints": None,
                "index_url": None,
                "editable": False,
                "upgrade": False,
            }
            position = 0
            while position < len(args):
                word = args[position]
                if word in ("-c", "--constraint"):
                    entry["constraints"] = args[position + 1]
                    position += 1
                elif word == "--index-url":
                    entry["index_url"] = args[position + 1]
                    position += 1
                elif word in ("-e", "--editable"):
                    entry["editable"] = True
                elif word == "--upgrade":
                    entry["upgrade"] = True
                elif not word.startswith("-"):
                    entry["targets"].append(word)
                position += 1
            found.append(entry)
    return found


def dockerfile() -> list[tuple[str, str]]:
    return instructions(ROOT / "Dockerfile")


def docker_args() -> dict[str, str]:
    values = {}
    for name, rest in dockerfile():
        if name == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            values.setdefault(key.strip(), value.strip())
    return values


def makefile_installs() -> list[dict]:
    """The installs of the ``venv`` recipe (``$(VENV)/.installed``): what ``make run`` needs.

    ``make test`` installs the test-only ``interop`` extra on top; the image does not need it.
    """
    recipe: list[str] = []
    inside = False
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("$(VENV)/.installed:"):
            inside = True
        elif inside and not line.startswith("\t"):
            break
        elif inside and "pip install" in line:
            recipe.append(line.strip())
    return pip_installs(recipe, {"BIN": "bin"})


def docker_installs() -> list[dict]:
    runs = [rest for name, rest in dockerfile() if name == "RUN"]
    return pip_installs(runs, docker_args())


def constraints_pin(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def test_the_image_installs_what_the_makefile_installs_in_the_same_order() -> None:
    make, docker = makefile_installs(), docker_installs()
    assert (
        [m["targets"] for m in make][0]
        == [d["targets"] for d in docker][0]
        == ["pip>=24", "setuptools", "wheel"]
    )
    torch_pin = constraints_pin("torch")
    assert make[1]["targets"] == docker[1]["targets"] == [torch_pin]  # pinned torch first, same version
    assert make[1]["constraints"] == "constraints.txt"
    assert docker[1]["index_url"] == "https://download.pytorch.org/whl/cpu"
    # then the project through the tested constraints: editable with dev tools locally, plain in the image
    assert make[2] == {**make[2], "targets": [".[dev]"], "constraints": "constraints.txt", "editable": True}
    assert docker[2] == {**docker[2], "targets": ["."], "constraints": "constraints.txt", "editable": False}
    assert len(make) == len(docker) == 3


def test_the_readme_install_commands_are_the_makefiles() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [line.split("#")[0].strip() for line in readme.splitlines() if "pip install" in line]
    installs = pip_installs(commands, {})
    assert {"targets": [constraints_pin("torch")], "constraints": "constraints.txt"}.items() <= next(
        i for i in installs if i["targets"] and i["targets"][0].startswith("torch")
    ).items()
    assert any(i["targets"] == [".[dev]"] and i["constraints"] == "constraints.txt" for i in installs)


def test_cmd_and_healthcheck_refer_to_things_that_exist() -> None:
    steps = dockerfile()
    scripts = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^tumorseg = "tumorseg\.cli:main"$', scripts, re.M)
    exposed = {int(rest.split("/")[0]) for name, rest in steps if name == "EXPOSE"}
    assert exposed == {8000}
    commands = [json.loads(rest) for name, rest in steps if name == "CMD"]
    assert len(commands) == 2  # baked and default stages
    parser = build_parser()
    for command in commands:
        assert command[0] == "tumorseg"
        args = parser.parse_args(command[1:])
        assert args.command == "serve" and args.host == "0.0.0.0" and args.port in exposed
    assert commands[0][-2:] == ["--model", "/app/model"]  # the baked stage serves its copied folder

    (health,) = [rest for name, rest in steps if name == "HEALTHCHECK"]
    exec_form = json.loads(health.split("CMD", 1)[1].strip())
    assert exec_form[:2] == ["python", "-c"]
    code = exec_form[2]
    ast.parse(code)  # valid Python
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", code)
    assert url and int(url[1]) in exposed and url[2] == "/health"

    from tumorseg.serving.app import ServeSettings, create_app, fastapi_app
    from tumorseg.serving.config import ServeConfig

    settings = ServeSettings(serve=ServeConfig(), predict=None, model_uri="x", tracking_uri="sqlite:///x")
    routes = {getattr(route, "path", None) for route in fastapi_app(create_app(settings)).routes}
    assert "/health" in routes


def test_copy_sources_and_base_image_args_exist() -> None:
    steps = dockerfile()
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert steps[1][0] == "FROM" and steps[1][1].startswith("${BASE_IMAGE}")
    for name, rest in steps:
        if name != "COPY":
            continue
        sources = [word for word in shlex.split(rest)[:-1] if not word.startswith("--")]
        for source in sources:
            if source == "${MODEL_DIR}":  # given at build time (--build-arg MODEL_DIR=...)
                continue
            assert (ROOT / source).exists(), f"COPY source {source} is missing"
    stages = [rest.split()[-1] for name, rest in steps if name == "FROM"]
    assert stages == ["runtime", "baked", "serve"]  # the default target (last) needs no build arg


def test_the_viewer_files_are_package_data() -> None:
    import fnmatch
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "tumorseg"
    ]
    package = ROOT / "src" / "tumorseg"
    static = sorted(
        p.relative_to(package).as_posix() for p in (package / "serving" / "static").rglob("*") if p.is_file()
    )
    assert {"serving/static/index.html", "serving/static/viewer.js", "serving/static/viewer.css"} <= set(
        static
    )
    unpackaged = [name for name in static if not any(fnmatch.fnmatch(name, g) for g in globs)]
    assert unpackaged == [], f"not in [tool.setuptools.package-data]: {unpackaged}"
