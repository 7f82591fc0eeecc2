"""Checks the Kubernetes manifests without a cluster.

Every overlay (and the base) is built with kustomize (`kubectl kustomize`); each object is
validated against the Kubernetes API schemas of the pinned versions (kubernetes-validate, strict:
an unknown field is an error, as the API server's strict field validation makes it), and each
custom resource against its operator's CRD schema vendored in ../crds (also strict, unless the
schema keeps unknown fields). Then checkov scans the rendered overlays and the Dockerfile; a
skipped check is skipped where the object or the Dockerfile says so, with its reason.

    python check.py                 # everything; exit status 1 on any failure
    python check.py --render NAME   # the overlay NAME (or `base`) as a JSON list, for the tests
"""

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
KUBERNETES = os.path.dirname(HERE)
ROOT = os.path.dirname(os.path.dirname(KUBERNETES))
BIN = os.path.dirname(sys.executable)
# The oldest Kubernetes minor version still supported upstream when this was pinned, and the
# newest: a manifest must be valid on both.
KUBERNETES_VERSIONS = ["1.35.0", "1.37.0"]


def kustomizations():
    """The base and every overlay, by name."""
    found = {"base": os.path.join(KUBERNETES, "base")}
    overlays = os.path.join(KUBERNETES, "overlays")
    for name in sorted(os.listdir(overlays)):
        found[name] = os.path.join(overlays, name)
    return found


def render(path):
    """The objects kustomize builds from `path`."""
    out = subprocess.run(
        [os.path.join(BIN, "kubectl"), "kustomize", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def strict(schema):
    """The schema with unknown fields refused wherever it lists the known ones, as a structural
    CRD schema with strict field validation does (x-kubernetes-preserve-unknown-fields keeps
    them)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schemas():
    """(apiVersion, kind) -> the vendored CRD's schema for that version."""
    schemas = {}
    crds = os.path.join(KUBERNETES, "crds")
    for name in sorted(os.listdir(crds)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(crds, name)) as f:
            for crd in yaml.safe_load_all(f):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group = crd["spec"]["group"]
                kind = crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    schema = version["schema"]["openAPIV3Schema"]
                    schemas[(f"{group}/{version['name']}", kind)] = strict(schema)
    return schemas


def name_of(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate(objects, schemas):
    """The problems found in `objects`, one line each."""
    problems = []
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in schemas:
            validator = jsonschema.Draft7Validator(schemas[key])
            for error in validator.iter_errors(obj):
                path = "/".join(str(p) for p in error.absolute_path)
                problems.append(f"{name_of(obj)}: {path}: {error.message}")
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = "/".join(str(p) for p in error.path)
                problems.append(f"{name_of(obj)} (Kubernetes {version}): {path}: {error.message}")
            except (
                kubernetes_validate.SchemaNotFoundError,
                kubernetes_validate.InvalidSchemaError,
            ) as error:
                problems.append(f"{name_of(obj)} (Kubernetes {version}): {error}")
    return problems


def checkov(rendered_dir):
    """Runs checkov on the rendered overlays and the Dockerfile; True when it passes."""
    ok = True
    for args in (
        ["-d", rendered_dir, "--framework", "kubernetes"],
        ["-f", os.path.join(ROOT, "Dockerfile"), "--framework", "dockerfile"],
    ):
        command = [os.path.join(BIN, "checkov"), "--quiet", "--compact", "--skip-download"]
        result = subprocess.run(command + args, capture_output=True, text=True)
        print(result.stdout.strip())
        if result.returncode != 0:
            print(result.stderr.strip(), file=sys.stderr)
            ok = False
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", metavar="NAME")
    args = parser.parse_args()
    found = kustomizations()
    if args.render:
        json.dump(render(found[args.render]), sys.stdout)
        return 0
    schemas = crd_schemas()
    failed = False
    rendered_dir = tempfile.mkdtemp(prefix="plw-manifests-")
    try:
        for name, path in found.items():
            objects = render(path)
            problems = validate(objects, schemas)
            kinds = sorted({o["kind"] for o in objects})
            print(f"{name}: {len(objects)} objects ({', '.join(kinds)}): "
                  f"{'valid' if not problems else f'{len(problems)} problem(s)'}")
            for problem in problems:
                print(f"  {problem}")
            failed |= bool(problems)
            if name != "base":
                # The base is not applied on its own (no namespace): scanned through the overlays.
                with open(os.path.join(rendered_dir, f"{name}.yaml"), "w") as f:
                    yaml.safe_dump_all(objects, f)
        failed |= not checkov(rendered_dir)
    finally:
        shutil.rmtree(rendered_dir)
    print("manifests: " + ("FAILED" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
