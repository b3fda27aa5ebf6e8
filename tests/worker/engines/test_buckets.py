from ringlet.worker.engines.torch.static_decode import buckets_for, linear_buckets


def test_buckets_double_up_to_the_context():
    assert buckets_for(1000) == [256, 512, 1000]
    assert buckets_for(256) == [256]
    assert buckets_for(8192) == [256, 512, 1024, 2048, 4096, 8192]


def test_cpu_buckets_every_128_positions():
    assert linear_buckets(1000) == [128, 256, 384, 512, 640, 768, 896, 1000]
    assert linear_buckets(128) == [128]
