"""HTTP edges: the FHIR REST facade (``fhir``), its interaction logic (``interactions``, ``bundles``), the
CapabilityStatement (``capability``) and the application factory (``app``). Nothing imports ``api``."""
