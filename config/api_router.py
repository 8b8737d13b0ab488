"""The one API router: every app registers its viewsets here."""

from __future__ import annotations

from rest_framework.routers import DefaultRouter

from connectors.api.views import ConnectorViewSet, CredentialViewSet
from integration.api.file_triggers import FileTriggerViewSet
from integration.api.views import (
    DeadLetterViewSet,
    PipelineViewSet,
    RunViewSet,
    SchemaChangeProposalViewSet,
    SchemaChangeViewSet,
)
from integration.api.workflows import WorkflowRunViewSet, WorkflowViewSet
from transforms.api.views import MappingViewSet, SchemaSubjectViewSet

router = DefaultRouter()
router.register("credentials", CredentialViewSet)
router.register("connectors", ConnectorViewSet)
router.register("pipelines", PipelineViewSet)
router.register("runs", RunViewSet)
router.register("dead-letters", DeadLetterViewSet)
router.register("schema-changes", SchemaChangeViewSet)
router.register("schema-proposals", SchemaChangeProposalViewSet)
router.register("workflows", WorkflowViewSet)
router.register("workflow-runs", WorkflowRunViewSet)
router.register("file-triggers", FileTriggerViewSet)
router.register("schemas", SchemaSubjectViewSet)
router.register("mappings", MappingViewSet)

urlpatterns = router.urls
