"""Classifier-feature FID on MNIST-like images, as an `evaluate` metric module.

Loaded by path (works offline; `evaluate.load("<name>")` would go to the Hub):

```python
import evaluate
fid = evaluate.load("/abs/path/to/hf_models/metrics/classifier_fid")           # uint8 images
fid = evaluate.load("/abs/path/to/hf_models/metrics/classifier_fid", "float")  # float images in [0, 1]
fid.compute(predictions=generated, references=real)   # -> {"fid": float}
```

`predictions` (generated) and `references` (real) are images of shape (N, 28, 28) each; `evaluate`
pairs them row by row, so pass sets of the same size (the FID floor depends on N anyway). The
features come from the judge shipped in `hf_models/mnist_classifier/weights`, so the latentheat
package (`hf_models`) must be importable: `pip install -e .` or run from the repository root.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Fréchet distance between Gaussians fitted to the penultimate-layer features (128-d) of a small CNN
trained on MNIST (99%+ test accuracy), computed between generated and reference images."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated images, (N, 28, 28): uint8 0..255 (config "uint8", the default) or float in [0, 1] (config "float").
    references: real images, same shape convention and the same N.
Returns:
    fid: the classifier-feature FID (float, lower is better; 0 for identical sets).
Examples:
    >>> fid = evaluate.load("/path/to/hf_models/metrics/classifier_fid")
    >>> fid.compute(predictions=test_images[:1000], references=train_images[:1000])["fid"]
"""

_CITATION = """@inproceedings{heusel2017gans,
  title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={NeurIPS}, year={2017}}"""

_DTYPES = {"uint8": "uint8", "default": "uint8", "float": "float32"}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClassifierFID(evaluate.Metric):
    def _info(self):
        if self.config_name not in _DTYPES:
            raise ValueError(f"config_name={self.config_name!r} is not one of {sorted(_DTYPES)}")
        image = datasets.Array2D(shape=(28, 28), dtype=_DTYPES[self.config_name])
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": image, "references": image}),
            reference_urls=["https://arxiv.org/abs/1706.08500"],
        )

    def _compute(self, predictions, references):
        # imported here (indented) so that evaluate's import scan does not treat hf_models as a pip package
        from hf_models.metrics.image_metrics import classifier_fid

        generated = np.asarray(predictions, dtype=_DTYPES[self.config_name])
        reference = np.asarray(references, dtype=_DTYPES[self.config_name])
        return {"fid": classifier_fid(generated, reference)}
