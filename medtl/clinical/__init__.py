"""The hospital side: de-identification (:mod:`~medtl.clinical.deid`), results back as DICOM (a Structured
Report and a Secondary Capture overlay, :mod:`~medtl.clinical.dicom_results`) and a PACS client and local
Orthanc (:mod:`~medtl.clinical.pacs`). Import the module you need: each pulls in its own DICOM libraries."""
