# In-cluster add-ons. GKE installs the NVIDIA driver and
# device plugin itself, so there is no NVIDIA chart here.

locals {
  system_node_selector = {
    "expertmesh.io/pool" = "system"
  }
}

# The KubeRay operator and kube-prometheus-stack, as on every expertmesh cluster
# (Dataplane V2 runs no kube-proxy to scrape).
module "kuberay_stack" {
  source = "../kuberay-stack"

  grafana_admin_password = var.grafana_admin_password
  node_selector          = local.system_node_selector
  scrape_kube_proxy      = false

  depends_on = [google_container_node_pool.system]
}
