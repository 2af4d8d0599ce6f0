"""Applications on any backbone: text classification, named-entity recognition and semantic-role
labelling. A task model is a backbone of any family (its output layer dropped) with a head;
it fine-tunes under every layout through the same training step as a language model
(meshlm.train.objective), predicts in parallel over files, and is scored with the field's
metrics beside classical baselines (baselines/). docs/tasks.md is the user's guide."""
