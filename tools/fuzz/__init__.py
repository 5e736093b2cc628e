"""Fuzz medtl's readers: every mutated file must be read, or refused with a typed error, in budget.

    python -m tools.fuzz [--n 10000] [--seed 0] [--jobs 2] [--budget 2G] [--timeout 10]
        [--data ../shared/data] [--seeds generated|data|both] [--out results/fuzz] [--keep-failures]
    python -m tools.fuzz --replay results/fuzz/failures.jsonl [--out DIR]   # re-run recorded mutants

(from the repository root). Seeds are small files made here (DICOM: CT slices, an RGB, a deflated and a
multi-frame object; NIfTI .nii and .nii.gz; grey, RGB and 16-bit PNG, JPEG and TIFF; a zipped 4-slice CT
series) and, with the data folder (--data, default $MEDTL_SHARED_DATA, else ../shared/data), every DICOM,
NIfTI and picture file in it (DICOMDIR and .npz left out) plus a zip of each of its DICOM series folders.
--seeds chooses them (default: both where the data folder exists, else generated).

Mutant i of run seed S is made deterministically from (S, i): a seed kind, a seed file and a
mutator are drawn, and the mutator draws its edits from its own random stream. Its recipe
(seed, mutator, S, i) regenerates it byte for byte (--replay). Mutator families:
  bytes    bit flips (1-64), 0x00/0xFF runs, truncation (anywhere, and inside the first
           132-2048 bytes), chunk duplication/deletion, appended garbage
  dicom    element lengths made huge, VRs swapped, transfer syntax swapped (another syntax, a
           non-UID, deflate without deflating), nested sequences up to 1000 deep, Rows/Columns
           0/1/65535, BitsAllocated/BitsStored/HighBit, NumberOfFrames, SamplesPerPixel,
           PhotometricInterpretation, MOSAIC and CSA headers, garbage spacing/geometry/rescale/
           window strings, empty/short/long pixel data, required elements removed
  nifti    dim, pixdim, datatype, bitpix, vox_offset, scl_slope/inter, qform/sform and quaternions,
           sizeof_hdr, magic, truncation (a .nii.gz is edited decompressed and recompressed),
           broken gzip streams
  picture  PNG chunk lengths, IHDR size/depth/colour type (CRC recomputed), bad CRCs, damaged
           IDAT, dropped chunks; JPEG markers and segments; TIFF IFD entries, strips, IFD loops
  zip      a member mutated as DICOM, 20,000 tiny members, a member declaring a huge size, deep
           directories, '../' and absolute names, duplicate names, non-DICOM members
  bomb     (rare) a deflated DICOM declaring 16384x16384x4 frames of zeros, a zip member and a
           .nii.gz that inflate to GiBs, a PNG of up to 30000x30000 zeros
DICOM edits are made on the encoded elements (tag, VR, length, value), so values pydicom would
refuse to write (a DS of 'abc', a length of 0xFFFFFFFE) are written all the same.

Each mutant is written to a temporary file and read by ``medtl.io.read_image`` in a fresh child
process, forked from a warm server process (one per job) that has imported the readers. The child
has the budget as medtl's read limit (MEDTL_MAX_INPUT_BYTES), an address-space limit of its size
plus twice the budget, and is killed after --timeout seconds. Outcomes:
  read     a Scan came back
  typed    a MedtlInputError subclass (its class is counted)
  other    any other exception: its type, first line and innermost medtl file:line are kept
  timeout  killed after --timeout seconds
  killed   the child died: a signal, an exit status, or no result
Peak memory is the growth of the child's max RSS during the read (ru_maxrss after minus before).

Prints a markdown table (rows per seed kind and per mutator family; outcome counts, peak MiB and
seconds of reading; a total row with the largest peak and the wall time), then the distinct
failure signatures. Writes OUT/summary.md, OUT/summary.json and OUT/failures.jsonl (recipe and
result of every other/timeout/killed or over-budget mutant) and OUT/results.jsonl (every mutant);
--keep-failures also copies the failing mutant files to OUT/failures/. Exit status 1 when any
mutant ended other, timeout or killed, or a peak went over the budget, else 0 (so CI can run it).

The package, one module per concern:
  seeds        the seed files (generated here, and those of the data folder)
  formats      byte-level helpers of the formats (zip, PNG chunks, NIfTI headers)
  dicom_file   a DICOM file as encoded elements, edited in place
  registry     the mutator registry (``@mutator``) and ``MUTATORS``
  mutators/    the mutators, one module per family (generic bytes, dicom, nifti, picture, archive, bomb)
  recipes      ``plan`` (mutant i's recipe) and ``make_mutant`` (its bytes, regenerated from the recipe)
  worker       the server process: forks a child per file, with the limits, and classifies how it ended
  server       ``Server``: one warm worker process, seen from the run
  runner       ``run``: make and read the mutants on ``jobs`` servers; the report
  report       the report's table, failure signatures and files
  cli          the command line (``python -m tools.fuzz``)
  coverage_guided  the same readers under atheris (libFuzzer), a separate tool

As tests/io/test_fuzz.py does: ``tools.fuzz.runner.run(n, seed, jobs, budget, timeout, seeds, out=...)``
returns the report (``tools.fuzz.report.format_report`` prints it); ``tools.fuzz.recipes.plan`` and
``make_mutant`` make a recipe and regenerate its bytes; ``tools.fuzz.server.Server(reader, budget).read(path,
timeout)`` classifies one file, with any ``module:function`` as the reader.
"""
