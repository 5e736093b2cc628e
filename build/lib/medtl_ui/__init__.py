"""The medtl web UI (Gradio). It calls only the public ``medtl`` API."""
