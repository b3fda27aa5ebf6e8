from ringlet.worker.engines.torch.cuda_graphs import buckets_for


def test_buckets_double_up_to_the_context():
    assert buckets_for(1000) == [256, 512, 1000]
    assert buckets_for(256) == [256]
    assert buckets_for(8192) == [256, 512, 1024, 2048, 4096, 8192]
