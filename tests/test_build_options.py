"""BuildOptions: one view per options class, the same options as PipelineOptions gives."""
from __future__ import annotations

import pickle

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions, TypeOptions

from pipeline.build import BuildConfig, BuildOptions, build_pipeline
from pipeline.sources import parse_source

FLAGS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing", "--pickle_library=cloudpickle"]


def test_views_are_made_once_and_share_the_options():
    options = BuildOptions(FLAGS)
    assert options.view_as(DirectOptions) is options.view_as(DirectOptions)
    assert options.view_as(DirectOptions).direct_num_workers == 2
    options.view_as(StandardOptions).runner = "SomeRunner"  # set through one view...
    assert options.get_all_options()["runner"] == "SomeRunner"  # ...seen by the options
    plain = PipelineOptions(FLAGS)
    plain.view_as(StandardOptions).runner = "SomeRunner"
    assert options.get_all_options() == plain.get_all_options()


def test_pickled_options_keep_their_values_not_their_views():
    options = BuildOptions(FLAGS)
    options.view_as(TypeOptions)
    copy = pickle.loads(pickle.dumps(options))
    assert "_views" not in copy.__dict__
    assert copy.view_as(DirectOptions).direct_running_mode == "multi_processing"
    assert copy.get_all_options() == options.get_all_options()


def test_the_build_graph_is_the_same_with_either_options(tmp_path, exif_samples):
    config = BuildConfig(sources=[f"exif:{exif_samples / 'gps'}"], out=str(tmp_path))
    graphs = []
    for options in (BuildOptions(FLAGS), PipelineOptions(FLAGS)):
        p = beam.Pipeline(options=options)
        build_pipeline(p, config, [parse_source(s) for s in config.sources])
        proto = p.to_runner_api()
        graphs.append(sorted((t.unique_name, t.spec.urn, tuple(sorted(t.inputs)), tuple(sorted(t.outputs)))
                             for t in proto.components.transforms.values()))
    assert graphs[0] == graphs[1] and len(graphs[0]) > 100
