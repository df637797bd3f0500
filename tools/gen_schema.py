#!/usr/bin/env python3
"""Derive fhir-core/data/r4-schema.json from the official FHIR R4 definitions.

Run from the repository root with the definitions folder as argument:
    python3 tools/gen_schema.py ../shared/fhir-r4
The output is committed so the product builds from this repository alone.
It keeps only what parsing, validation and serialisation need: per type its
elements (name, cardinality, types, choice, xml attribute, summary flag and,
for `code` elements with a required binding to an enumerable value set, the
allowed codes), and per primitive its JSON kind and the spec's regex.
"""
import json
import sys
import os

SRC = sys.argv[1] if len(sys.argv) > 1 else "../shared/fhir-r4"
OUT = os.path.join(os.path.dirname(__file__), "..", "fhir-core", "data", "r4-schema.json")

def load(name):
    with open(os.path.join(SRC, name)) as f:
        return json.load(f)

types_bundle = load("profiles-types.json")
res_bundle = load("profiles-resources.json")
vs_bundle = load("valuesets.json")
v3_bundle = load("v3-codesystems.json")

code_systems = {}
value_sets = {}
for b in (vs_bundle, v3_bundle):
    for e in b["entry"]:
        r = e["resource"]
        if r["resourceType"] == "CodeSystem":
            code_systems[r["url"]] = r
        elif r["resourceType"] == "ValueSet":
            value_sets[r["url"]] = r

def cs_codes(cs):
    out = []
    def walk(concepts):
        for c in concepts or []:
            out.append(c["code"])
            walk(c.get("concept"))
    walk(cs.get("concept"))
    return out

def vs_codes(url, depth=0):
    """All codes of a value set, or None when it cannot be enumerated from the spec alone."""
    url = url.split("|")[0]
    vs = value_sets.get(url)
    if vs is None or depth > 4:
        return None
    compose = vs.get("compose")
    if not compose or compose.get("exclude"):
        return None
    codes = []
    for inc in compose.get("include", []):
        if inc.get("filter"):
            return None
        if inc.get("valueSet"):
            for sub in inc["valueSet"]:
                sc = vs_codes(sub, depth + 1)
                if sc is None:
                    return None
                codes.extend(sc)
            if not inc.get("system"):
                continue
        if inc.get("concept"):
            codes.extend(c["code"] for c in inc["concept"])
        elif inc.get("system"):
            cs = code_systems.get(inc["system"])
            if cs is None or cs.get("content") not in (None, "complete"):
                return None
            cc = cs_codes(cs)
            if not cc:
                return None
            codes.extend(cc)
    return sorted(set(codes)) if codes else None

primitives = {}
JSON_KIND = {"boolean": "boolean", "integer": "number", "positiveInt": "number",
             "unsignedInt": "number", "decimal": "number"}
for e in types_bundle["entry"]:
    r = e["resource"]
    if r.get("kind") != "primitive-type":
        continue
    regex = None
    for el in r["snapshot"]["element"]:
        if el["path"] == r["id"] + ".value":
            for t in el.get("type", []):
                for ext in t.get("extension", []):
                    if ext["url"].endswith("/regex"):
                        regex = ext["valueString"]
    primitives[r["id"]] = {"json": JSON_KIND.get(r["id"], "string"), "regex": regex}

def fhir_type(t, path):
    code = t["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        if path.endswith(".id") and path.count(".") == 1 and path.split(".")[0] in resource_names:
            return "id"
        for ext in t.get("extension", []):
            if ext["url"].endswith("structuredefinition-fhir-type"):
                return ext["valueUrl"]
        return "string"
    return code

resource_names = {e["resource"]["id"] for e in res_bundle["entry"]
                  if e["resource"]["resourceType"] == "StructureDefinition"
                  and e["resource"].get("kind") == "resource"}

types = {}

def add_structure(sd, kind):
    root = sd["id"]
    elements = sd["snapshot"]["element"]
    owners = {root: []}
    for el in elements:
        path = el["path"]
        if path == root:
            continue
        if path.startswith(root + ".") is False:
            continue
        parent, name = path.rsplit(".", 1)
        if parent not in owners:
            # primitive value elements of primitive types etc.
            continue
        choice = name.endswith("[x]")
        if choice:
            name = name[:-3]
        entry = {"n": name, "min": el.get("min", 0), "max": -1 if el.get("max") == "*" else int(el.get("max", "1"))}
        if "contentReference" in el:
            entry["t"] = [el["contentReference"].split("#", 1)[1]]
        else:
            ts = []
            for t in el.get("type", []):
                code = fhir_type(t, path)
                if code in ("BackboneElement", "Element") and parent is not None and path != root:
                    code = path
                    owners[path] = []
                ts.append(code)
            entry["t"] = ts
        if choice:
            entry["choice"] = True
        if "xmlAttr" in (el.get("representation") or []):
            entry["attr"] = True
        if el.get("isSummary"):
            entry["summary"] = True
        b = el.get("binding")
        if b and b.get("strength") == "required" and entry["t"] == ["code"] and b.get("valueSet"):
            codes = vs_codes(b["valueSet"])
            if codes:
                entry["codes"] = codes
        owners[parent].append(entry)
    for owner, els in owners.items():
        types[owner] = {"kind": kind if owner == root else "backbone", "elements": els}

for e in types_bundle["entry"]:
    r = e["resource"]
    if r.get("kind") == "complex-type" and r["id"] not in ("Element", "BackboneElement"):
        if r.get("derivation") == "constraint":
            continue
        add_structure(r, "complex")
for e in res_bundle["entry"]:
    r = e["resource"]
    if r["resourceType"] == "StructureDefinition" and r.get("kind") == "resource":
        add_structure(r, "abstract" if r.get("abstract") else "resource")

out = {"fhirVersion": "4.0.1", "primitives": primitives, "types": types}
with open(OUT, "w") as f:
    json.dump(out, f, separators=(",", ":"), sort_keys=True)
print("resources:", sum(1 for t in types.values() if t["kind"] == "resource"),
      "types:", len(types), "primitives:", len(primitives), "bytes:", os.path.getsize(OUT))
