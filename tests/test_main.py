"""vit_jax.main's multi-process start-up: what it refuses before training alone by mistake."""

import pytest

from vit_jax import main
from vit_jax.config_check import ConfigError


def test_an_mpi_launch_jax_did_not_join_is_refused_naming_the_flags():
    with pytest.raises(ConfigError, match=r"OMPI_COMM_WORLD_SIZE=4: the launcher started 4 processes but JAX "
                                          r"joined 1; pass --coordinator_address=HOST:PORT .* --num_processes=4"):
        main.check_process_count({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}, 1)
    with pytest.raises(ConfigError, match=r"PMI_SIZE=2"):
        main.check_process_count({"PMI_SIZE": "2"}, 1)
    main.check_process_count({"OMPI_COMM_WORLD_SIZE": "4"}, 4)  # joined: fine
    main.check_process_count({"PMI_SIZE": "1"}, 1)
    main.check_process_count({}, 1)


def test_process_flags_without_a_coordinator_are_an_error_not_ignored():
    with pytest.raises(ConfigError, match=r"--num_processes and --process_id need --coordinator_address"):
        main.initialize_distributed(None, 2, 0)
    with pytest.raises(ConfigError, match=r"needs --num_processes and --process_id as well"):
        main.initialize_distributed("127.0.0.1:1234", None, 0)
