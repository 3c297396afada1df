"""The streaming convert/quantize pipeline shared by ``gguftool convert`` and ``gguftool quantize``.

``source`` declares what the pipeline reads (a TensorSource of SourceTensors: the GGUF one is ``gguftool.gguf.source``,
the Hugging Face one ``gguftool.hf.source``), ``policy`` mirrors llama.cpp's per-tensor type choice, ``plan``
decides and checks everything about the output before a byte is written, ``execute`` streams every tensor through
the kernels into the writer, and ``io`` reads the source rows in slabs, ahead of the kernels.
"""
