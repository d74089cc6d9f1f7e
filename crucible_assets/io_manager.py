"""Assets pass ArtifactRefs; downstream loads the latest ref of its upstream key from the
store and verifies its bytes against the manifest before use. Nothing is pickled."""

from dagster import ConfigurableIOManager, InputContext, OutputContext, ResourceDependency

from resources.store.artifact_store import ArtifactRef, ArtifactStore


class ArtifactIOManager(ConfigurableIOManager):
    store: ResourceDependency[ArtifactStore]

    def handle_output(self, context: OutputContext, obj: ArtifactRef) -> None:
        self.store.set_latest(obj)

    def load_input(self, context: InputContext) -> ArtifactRef:
        ref = self.store.latest(context.asset_key.to_user_string())
        self.store.open_verified(ref)
        return ref
