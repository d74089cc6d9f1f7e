"""Assets pass ArtifactRefs; downstream loads the latest ref of its upstream key (of the same
partition, for a partitioned upstream) from the store and verifies its bytes against the
manifest before use. Nothing is pickled."""

from dagster import ConfigurableIOManager, InputContext, OutputContext, ResourceDependency

from resources.store.artifact_store import ArtifactRef, ArtifactStore


class ArtifactIOManager(ConfigurableIOManager):
    store: ResourceDependency[ArtifactStore]

    def handle_output(self, context: OutputContext, obj: ArtifactRef) -> None:
        self.store.set_latest(obj)

    def load_input(self, context: InputContext) -> ArtifactRef:
        name = context.asset_key.to_user_string()
        if context.has_asset_partitions:  # a sweep point reads its own point's upstream
            name = f"{name}/{context.asset_partition_key}"
        ref = self.store.latest(name)
        self.store.open_verified(ref)
        return ref
