#!/usr/bin/env python3
"""Derive the search-parameter data of fhir-core from the official FHIR R4 definitions.

Run from the repository root with the definitions folder as argument:
    python3 tools/gen_search_params.py ../shared/fhir-r4
It writes two compact JSON files (committed, so the product builds from this repository alone):

* fhir-core/data/r4-search-parameters.json: all SearchParameters of the spec, keeping only what
  search needs: url, code, base, type, expression, xpathUsage, target, modifier, comparator,
  multipleOr, multipleAnd, component (definition, expression) and chain. Absent and empty
  members are left out; narrative, contact and the XPath are dropped. 80 reference parameters
  may point at any of the 145 resource types R4 lists as reference targets; that list is written
  once as "allTargets" and those parameters have "target":"all" (it would be 40% of the file).
  One defect of the spec is corrected (see fix_component).
* fhir-core/data/r4-compartment-patient.json: the Patient CompartmentDefinition as an object
  from resource type to the codes of the parameters that put a resource in the compartment
  (resource types that can never be in it are left out).
"""
import json
import os
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "../shared/fhir-r4"
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fhir-core", "data")

KEEP = [
    "url", "code", "base", "type", "expression", "xpathUsage", "target", "modifier",
    "comparator", "multipleOr", "multipleAnd", "component", "chain",
]


def load(name):
    with open(os.path.join(SRC, name), encoding="utf-8") as f:
        return json.load(f)


def write(name, value):
    path = os.path.join(DATA, name)
    with open(path, "w", encoding="utf-8") as f:
        # Compact, keeping the spec's order of parameters.
        json.dump(value, f, separators=(",", ":"), ensure_ascii=False)
        f.write("\n")
    print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path):,} bytes)")


def fix_component(url, components):
    """Corrects a known defect of the R4 definitions.

    DocumentReference-relationship pairs the definition `relatesto` (a reference) with the
    expression `code` and `relation` (a token) with `target`, so neither component could ever
    produce a value. The definitions' order is kept and the expressions are swapped.
    """
    if url == "http://hl7.org/fhir/SearchParameter/DocumentReference-relationship":
        exprs = {c["definition"].rsplit("/", 1)[-1]: c["expression"] for c in components}
        if exprs == {"DocumentReference-relatesto": "code", "DocumentReference-relation": "target"}:
            fixed = {"DocumentReference-relatesto": "target", "DocumentReference-relation": "code"}
            return [{"definition": c["definition"], "expression": fixed[c["definition"].rsplit("/", 1)[-1]]}
                    for c in components]
    return components


def search_parameters():
    bundle = load("search-parameters.json")
    out = []
    for entry in bundle["entry"]:
        sp = entry["resource"]
        if sp.get("resourceType") != "SearchParameter":
            continue
        slim = {}
        for key in KEEP:
            value = sp.get(key)
            if value is None or value == [] or value == "":
                continue
            if key == "component":
                value = [{"definition": c["definition"], "expression": c["expression"]} for c in value]
                value = fix_component(sp["url"], value)
            if key == "xpathUsage" and value == "normal":
                # The default; leaving it out keeps the file small.
                continue
            slim[key] = value
        out.append(slim)
    if len(out) != 1378:
        sys.exit(f"expected the 1,378 R4 search parameters, found {len(out)}")
    longest = max((p.get("target", []) for p in out), key=len)
    all_targets = sorted(longest)
    for p in out:
        if sorted(p.get("target", [])) == all_targets:
            p["target"] = "all"
    return {"fhirVersion": "4.0.1", "allTargets": all_targets, "searchParameters": out}


def patient_compartment():
    cd = load("compartmentdefinition-patient.json")
    out = {}
    for r in cd["resource"]:
        params = r.get("param") or []
        if params:
            out[r["code"]] = params
    return out


if __name__ == "__main__":
    write("r4-search-parameters.json", search_parameters())
    write("r4-compartment-patient.json", patient_compartment())
