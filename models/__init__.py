"""edgeward's pretrained ONNX models: installed as the data-only package ``edgeward_models``.

The files beside this one (``manifest.json``, the ``*.onnx`` models, ``LICENSES/``) are the
package's data; the gateway and the core find them with ``importlib.resources`` and check every
file against the manifest's sha256 before loading it. There is no code here.
"""
