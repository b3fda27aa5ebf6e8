"""What the tests share: launchers of live nodes and clusters, fakes of what cannot exist here, builders of small
models and checkpoints. Test modules import from here, never from each other."""
