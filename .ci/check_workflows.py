"""Check every GitHub Actions workflow against GitHub's workflow schema, offline: the
schema is checked in (.ci/schemas/github-workflow.json, SchemaStore's, as vendored by
check-jsonschema 0.33.2; Apache-2.0). Exit 1 naming the file, the place and the problem."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]


class _Loader(yaml.SafeLoader):
    """YAML as GitHub reads it: `on` is a key, not YAML 1.1's boolean true."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def problems(schema: dict[str, object]) -> list[str]:
    found = []
    for path in sorted((ROOT / ".github" / "workflows").glob("*.y*ml")):
        document = yaml.load(path.read_text(), Loader=_Loader)
        validator = jsonschema.Draft7Validator(schema)
        for error in validator.iter_errors(document):
            where = "/".join(str(p) for p in error.absolute_path) or "(top)"
            found.append(f"{path.relative_to(ROOT)}: {where}: {error.message}")
    return found


def main() -> int:
    schema = json.loads((ROOT / ".ci" / "schemas" / "github-workflow.json").read_text())
    found = problems(schema)
    for line in found:
        print(line, file=sys.stderr)
    workflows = len(list((ROOT / ".github" / "workflows").glob("*.y*ml")))
    print(f"{workflows} workflow(s) checked against GitHub's schema: {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
