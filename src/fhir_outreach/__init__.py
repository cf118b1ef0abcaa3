"""fhir-outreach: a FHIR-native patient-outreach engine that sits beside any FHIR server.

The package follows the data flow in DESIGN.md: ``api`` (HTTP edges) over ``fhir`` (models, search,
FHIRPath) and ``store`` (durable, versioned resources on SQLite or MongoDB).
"""

__version__ = "0.1.0"
FHIR_VERSION = "4.0.1"
