"""FHIR knowledge shared by every layer: resource models, search parameters, search, FHIRPath."""
