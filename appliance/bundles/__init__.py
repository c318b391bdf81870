"""Model bundles: models carried on a disk as an OCI image layout, a directory or a tar of one.

    oci-layout                       {"imageLayoutVersion": "1.0.0"}
    index.json                       one manifest per model, ref.name ``name-tag``, written last
    blobs/sha256/<hex>               the models' files, each manifest, the empty config ``{}``

``oras cp --from-oci-layout``, ``skopeo copy oci:DIR:REF`` and cosign handle it as it is, so a
site can push a bundle into its own registry, and ``appliance models pull oci://…`` reads it
back from there. ``layout`` is the format, ``export`` writes it, ``importer`` reads it (every
blob verified before any model is registered), ``service`` is what the CLI and the API call.

Imports: the model service, the store's record types, errors, audit.
"""

from appliance.bundles.importer import ImportedModel, ImportReport
from appliance.bundles.service import BundleService, ExportPlan

__all__ = ["BundleService", "ExportPlan", "ImportReport", "ImportedModel"]
