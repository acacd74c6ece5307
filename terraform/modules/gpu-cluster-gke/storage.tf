# Model weights live on Filestore (NFS) so every Ray pod on every node mounts
# the same copy (ReadWriteMany): the loader Job downloads once, workers read in
# parallel. The Filestore CSI driver is enabled on the cluster.
resource "kubernetes_storage_class" "models" {
  metadata {
    name = "expertmesh-models"
  }

  storage_provisioner    = "filestore.csi.storage.gke.io"
  reclaim_policy         = var.models_reclaim_policy
  allow_volume_expansion = true
  # Lets the CSI driver create the instance in a zone where the first
  # consumer is scheduled.
  volume_binding_mode = "WaitForFirstConsumer"

  parameters = {
    tier    = var.filestore_tier
    network = google_compute_network.this.name
  }

  depends_on = [google_container_node_pool.system]
}
