# In-cluster add-ons. Chart versions are pinned literally (not variables) so a
# plan never pulls a chart nobody reviewed. GKE installs the NVIDIA driver and
# device plugin itself, so there is no NVIDIA chart here.

locals {
  monitoring_namespace = "monitoring"

  system_node_selector = {
    "expertmesh.io/pool" = "system"
  }
}

resource "helm_release" "kube_prometheus_stack" {
  name             = "kube-prometheus-stack"
  namespace        = local.monitoring_namespace
  create_namespace = true
  repository       = "https://prometheus-community.github.io/helm-charts"
  chart            = "kube-prometheus-stack"
  version          = "75.12.0"

  values = [yamlencode({
    prometheus = {
      prometheusSpec = {
        # Select every PodMonitor/ServiceMonitor/PrometheusRule in the cluster,
        # not just those labelled with this release (the Ray PodMonitor is not).
        podMonitorSelectorNilUsesHelmValues     = false
        serviceMonitorSelectorNilUsesHelmValues = false
        ruleSelectorNilUsesHelmValues           = false
        retention                               = "15d"
        nodeSelector                            = local.system_node_selector
      }
    }
    grafana = {
      nodeSelector = local.system_node_selector
      sidecar = {
        dashboards = {
          # Loads every ConfigMap labelled grafana_dashboard: "1", e.g. the
          # expertmesh MoE dashboard the examples create.
          enabled         = true
          label           = "grafana_dashboard"
          labelValue      = "1"
          searchNamespace = "ALL"
        }
      }
    }
    # Managed control plane (and no kube-proxy under Dataplane V2): these
    # targets cannot be scraped and would only fire alerts.
    kubeControllerManager = { enabled = false }
    kubeScheduler         = { enabled = false }
    kubeEtcd              = { enabled = false }
    kubeProxy             = { enabled = false }
  })]

  set_sensitive {
    name  = "grafana.adminPassword"
    value = var.grafana_admin_password
  }

  depends_on = [google_container_node_pool.system]
}

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  namespace        = "kuberay-system"
  create_namespace = true
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  # Must match the KubeRay CRDs vendored by expertmesh (1.7).
  version = "1.7.0"

  values = [yamlencode({
    nodeSelector = local.system_node_selector
  })]

  depends_on = [google_container_node_pool.system]
}
